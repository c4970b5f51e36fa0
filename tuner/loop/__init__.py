"""`kttune run`: the ask/tell loop whose budget counts launches, one launch at a time, the
dry run, and the progress line."""
