"""Shell completion scripts generated from an argparse parser: subcommands, their options,
the choices of options and positionals, and file names where an option takes a path. zsh
gets the same function through bashcompinit."""
from __future__ import annotations

import argparse
import shlex

# Options whose value is a path (file-name completion); a search space is a YAML file.
PATH_OPTIONS = frozenset({"--space", "--out", "--studies-dir", "--model", "--kt-weight-path", "--dataset"})
YAML_OPTIONS = frozenset({"--space"})


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _words(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """Option strings, choices per option, choices of the positionals."""
    options: list[str] = []
    choices: dict[str, list[str]] = {}
    positional: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            options += [o for o in action.option_strings if o.startswith("--")]
            if action.choices:
                for o in action.option_strings:
                    choices[o] = [str(c) for c in action.choices]
        elif action.choices:
            positional += [str(c) for c in action.choices]
    return options, choices, positional


def bash_script(parser: argparse.ArgumentParser) -> str:
    prog = parser.prog
    fn = "_" + prog.replace("-", "_")
    subs = _subparsers(parser)
    top_options, _, _ = _words(parser)
    cases = []
    for name, sub in subs.items():
        options, choices, positional = _words(sub)
        lines = [f"    {name})", f"      opts={shlex.quote(' '.join(options))}",
                 f"      words={shlex.quote(' '.join(positional))}", "      case \"$prev\" in"]
        for option, values in choices.items():
            lines.append(f"        {option}) COMPREPLY=($(compgen -W {shlex.quote(' '.join(values))} -- \"$cur\")); return;;")
        for option in sorted(PATH_OPTIONS & set(options)):
            pattern = "-X '!*.y*ml' -o plusdirs" if option in YAML_OPTIONS else ""
            lines.append(f"        {option}) COMPREPLY=($(compgen -f {pattern} -- \"$cur\")); return;;")
        lines += ["      esac", "      ;;"]
        cases.append("\n".join(lines))
    takes_value = sorted({o for sub in subs.values() for a in sub._actions if a.option_strings and a.nargs != 0
                          for o in a.option_strings})
    return f"""# {prog} completion for bash: eval "$({prog} completion bash)"
{fn}() {{
  local cur prev cmd="" opts="" words="" w i
  cur="${{COMP_WORDS[COMP_CWORD]}}"
  prev="${{COMP_WORDS[COMP_CWORD-1]}}"
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="${{COMP_WORDS[i]}}"
    case "$w" in -*) ;; *) cmd="$w"; break;; esac
  done
  if [[ -z "$cmd" ]]; then
    COMPREPLY=($(compgen -W {shlex.quote(' '.join([*subs, *top_options]))} -- "$cur"))
    return
  fi
  case "$cmd" in
{chr(10).join(cases)}
  esac
  case "$prev" in {'|'.join(takes_value) or '--'}) return;; esac
  COMPREPLY=($(compgen -W "$opts $words" -- "$cur"))
}}
complete -o default -F {fn} {prog}
"""


def zsh_script(parser: argparse.ArgumentParser) -> str:
    return (f"#compdef {parser.prog}\n# {parser.prog} completion for zsh: eval \"$({parser.prog} completion zsh)\"\n"
            "autoload -U +X bashcompinit && bashcompinit\n" + bash_script(parser))


SHELLS = {"bash": bash_script, "zsh": zsh_script}
