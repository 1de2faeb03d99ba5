"""The terminal every adaspec command prints to, and the rule that a user's error is one line, not a traceback.

`out` carries results (wide tables when piped), `err` progress and errors (never broken mid-word). `run_cli`
is the entry point of every command-line app (`adaspec`, `python -m adaspec.sidecar`): an `AdaspecError`
becomes `error: <message>` and exit code 2, Ctrl-C exit code 130.
"""

from __future__ import annotations

import sys
from typing import Callable

from rich.console import Console
from rich.text import Text

from adaspec.core.errors import AdaspecError

out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, soft_wrap=True)


def run_cli(app: Callable[[], object]) -> None:
    try:
        app()
    except AdaspecError as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
