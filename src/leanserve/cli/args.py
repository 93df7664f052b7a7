"""What every command module shares: the parser pieces (a command, --repo, a model reference, --json),
defaults read from the config classes, the version a command acts on, and how a missing extra is said."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import sys
from collections.abc import Iterator
from typing import Any

from leanserve.errors import InvalidInput
from leanserve.model import default_repo


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error said in one line (and exit status 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Help with each option's default said once: the literal one, or the one its config class holds
    (``config_default``), read only when help is printed; never ``(default: None)``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.option_strings == [] or action.default is argparse.SUPPRESS:
            return text
        shown = getattr(action, "config_default", None)
        if shown is not None:
            return f"{text} (default: {str(shown()).replace('%', '%%')})"
        if action.default not in (None, False, [], ""):
            return f"{text} (default: %(default)s)"
        return text


def config_default(parser_action: argparse.Action, owner: str, name: str) -> argparse.Action:
    """Mark an option (left at default None) whose default lives in ``owner`` (``"module:Class"`` of a
    dataclass or ``"module:function"``) as ``name``; help shows that value, read when help is printed
    (so a heavy module is not imported to parse arguments). Returns the action."""
    def shown() -> Any:
        module, _, attr = owner.partition(":")
        target = getattr(importlib.import_module(module), attr)
        if dataclasses.is_dataclass(target):
            field = next(f for f in dataclasses.fields(target) if f.name == name)
            return field.default if field.default is not dataclasses.MISSING else field.default_factory()
        return inspect.signature(target).parameters[name].default

    parser_action.config_default = shown
    return parser_action


def given(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    """The options the user gave, as keyword arguments: ``given(args, lr="lr", window="window")`` maps
    keyword -> attribute, leaving out those left at None, so the config class's own default applies."""
    return {key: getattr(args, attr) for key, attr in names.items() if getattr(args, attr) is not None}


def command(sub, name: str, func, help_text: str, example: str) -> argparse.ArgumentParser:
    """Add subcommand ``name`` that runs ``func(args)``, with its help and an example."""
    parser = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                            formatter_class=Formatter)
    parser.set_defaults(func=func)
    return parser


def add_repo(parser: argparse.ArgumentParser) -> None:
    """``--repo DIR``: the model repository ($LEANSERVE_REPO or ./model-repo)."""
    parser.add_argument("--repo", default=str(default_repo()), metavar="DIR",
                        help="model repository folder (env LEANSERVE_REPO; default: %(default)s)")


def add_model_ref(parser: argparse.ArgumentParser, help_text: str = "MODEL or MODEL:VERSION "
                  "(default: the version serving most traffic)", version_option: bool = True) -> None:
    """A ``model`` argument taking NAME[:VERSION], and ``--version`` as the other way to name the version."""
    parser.add_argument("model", help=help_text)
    if version_option:
        parser.add_argument("--version", help="version (instead of MODEL:VERSION)")


def add_json(parser: argparse.ArgumentParser, what: str = "the report") -> None:
    """``--json``: one JSON document on stdout instead of text."""
    parser.add_argument("--json", action="store_true", help=f"print {what} as one JSON document")


def model_ref(args: argparse.Namespace) -> tuple[str, str | None]:
    """(name, version or None) from ``args.model`` (NAME or NAME:VERSION) and ``args.version``; a version
    given both ways must agree. Raises InvalidInput."""
    name, sep, version = args.model.partition(":")
    option = getattr(args, "version", None)
    if not name:
        raise InvalidInput(f"{args.model!r}: expected MODEL or MODEL:VERSION")
    if sep and option is not None and str(option) != version:
        raise InvalidInput(f"{args.model} and --version {option} name different versions")
    return name, (version or None) if sep else (None if option is None else str(option))


def open_repo(args: argparse.Namespace, create: bool = False):
    """The repository ``--repo`` names (created only when ``create``)."""
    from leanserve.repository import Repository

    return Repository(args.repo, create=create)


def subject(repo, name: str, version: str | int | None):
    """The version ``version`` names, or (None or empty) the version serving most of ``name``'s traffic,
    said on stderr so the output stays clean. Raises ModelNotFound or InvalidName."""
    ref = repo.resolve(name, version if version not in ("", None) else None)
    if version in ("", None):
        print(f"using {ref}, the version serving most traffic (name another as {name}:VERSION)", file=sys.stderr)
    return ref


@contextlib.contextmanager
def needs_extra(command_name: str, extra: str, *modules: str) -> Iterator[None]:
    """Turn a ModuleNotFoundError for one of ``modules`` inside the block into InvalidInput naming the extra."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in modules:
            raise InvalidInput(f"leanserve {command_name} needs {exc.name}, which is not installed: "
                               f"pip install 'leanserve[{extra}]'") from None
        raise


def print_json(document: Any) -> None:
    """One JSON document on stdout."""
    print(json.dumps(document, indent=2, default=str))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def add_force(parser, what: str) -> None:
    """``--force``: register ``what`` (a version worse than its parent on held-out data) anyway, with a warning."""
    parser.add_argument("--force", action="store_true",
                        help=f"register {what} anyway, with a warning (without it: refused, nothing registered)")
