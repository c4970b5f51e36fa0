from __future__ import annotations

from tuner.config import load_space
from tuner.server.argv import build_server_argv, flag_args
from tuner.trial.launch import server_argv


def test_flag_rendering_follows_sglang_config_rules() -> None:
    assert flag_args({"a": True, "b": False, "c": [0, 1], "d": 0.98, "e": "x y"}) == [
        "--a", "--c", "0", "1", "--d", "0.98", "--e", "x y"]


def test_argv_is_a_list_with_host_and_port_last() -> None:
    argv = build_server_argv(["py", "-m", "sglang.launch_server"], {"kt-cpuinfer": 56}, host="127.0.0.1", port=4000)
    assert argv == ["py", "-m", "sglang.launch_server", "--kt-cpuinfer", "56", "--host", "127.0.0.1", "--port", "4000"]


def test_seed_argv_from_kimi_space() -> None:
    space = load_space("search_spaces/kimi-k2-thinking-8xl20.yaml", check_paths=False)
    argv = server_argv(space, space.launch_flags(space.baseline), 60000)
    joined = " ".join(argv[1:])
    for piece in ["-m sglang.launch_server", "--kt-cpuinfer 56", "--kt-threadpool-count 2",
                  "--kt-num-gpu-experts 200", "--kt-method AMXINT4", "--attention-backend flashinfer",
                  "--trust-remote-code", "--mem-fraction-static 0.98", "--chunked-prefill-size 4096",
                  "--max-running-requests 37", "--max-total-tokens 37000", "--enable-mixed-chunk",
                  "--tensor-parallel-size 8", "--enable-p2p-check", "--disable-shared-experts-fusion",
                  "--host 127.0.0.1", "--port 60000"]:
        assert piece in joined, piece
