"""The CLI's options: one flag per TrainConfig field, generated from the field (its name, default, the help
and accepted values in its metadata, its group in ``config.SECTIONS``), the YAML ``--config`` loader, and an
argparse parser whose errors are one ``grao: error: ...`` line.

Every value is checked where it enters, with the messages of ``TrainConfig.validate``: a flag by its argparse
``type`` (``--group-size must be an integer >= 1, got '0'``), a YAML key when the file is read
(``run.yaml: group_size must be an integer >= 1, got 'four'``). Unknown options, keys and choices suggest
the nearest valid one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re

from grao.trainer.config import (
    OPTIONS,
    SECTIONS,
    ConfigError,
    TrainConfig,
    check_field,
    check_model_source,
    suggest_field,
)


class Parser(argparse.ArgumentParser):
    """argparse with errors as one line: ``grao: error: <what> (did you mean ...?)``, exit status 2."""

    def error(self, message: str):
        # "argument --group-size: must be ..." -> "--group-size must be ..." (the wording of TrainConfig.validate)
        message = re.sub(r"^argument ([\w-]+)(?:/-[\w-]+)*: (?=must )", r"\1 ", message)
        m = re.search(r"argument COMMAND: invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = [c.strip().strip("'") for c in m.group(2).split(",")]
            close = difflib.get_close_matches(m.group(1), choices, n=1)
            message = (f"unknown command {m.group(1)!r} (" + (f"did you mean {close[0]!r}? " if close else "")
                       + f"commands: {', '.join(choices)})")
        self.exit(2, f"grao: error: {message}\n")

    def unknown_arguments(self, extra: list[str]) -> None:
        """Refuse arguments this (sub)command does not take, suggesting the nearest of its options."""
        flags = [s for a in self._actions for s in a.option_strings if a.help != argparse.SUPPRESS]
        option = next((x for x in extra if x.startswith("-")), None)
        if option is None:
            self.error(f"unexpected argument {extra[0]!r} (see {self.prog} --help)")
        name = option.split("=", 1)[0]
        close = difflib.get_close_matches(name, flags, n=1)
        hint = f"did you mean {close[0]}?" if close else f"see {self.prog} --help"
        self.error(f"{self.prog} has no option {name} ({hint})")


def _metavar(name: str) -> str:
    opt = OPTIONS[name]
    if opt.kind in ("choice", "auto_bool"):
        return "{" + ",".join(opt.choices or ("auto", "true", "false")) + "}"
    return {"int": "N", "float": "X", "file": "FILE", "reward": "REWARD", "device": "DEVICE"}.get(opt.kind, "TEXT")


def _help(name: str, default, text: str | None = None) -> str:
    """The field's help (``metadata["help"]``, or ``text``), the values it accepts where they are a range, and the
    default: "G: completions sampled per prompt (grpo: >= 2) (an integer >= 1; default: 8)"."""
    opt = OPTIONS[name]
    text = text or TrainConfig.__dataclass_fields__[name].metadata["help"]
    allowed = f"{opt.allowed()}; " if opt.kind in ("int", "float", "device") else ""
    shown = str(default).lower() if isinstance(default, bool) or default is None else default
    return f"{text} ({allowed}default: {shown})".replace("%", "%%")


def _checker(name: str):
    def check(text: str):
        try:
            return check_field(name, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)[len(name) + 1:]) from None
    return check


def add_config_flags(parser: argparse.ArgumentParser, defaults: dict | None = None, *, only: tuple = (),
                     exclude: tuple = (), helps: dict[str, str] | None = None) -> None:
    """One flag per TrainConfig field (``--group-size`` for group_size), grouped as in ``SECTIONS``; ``only``
    limits them to the fields a command uses, ``helps`` replaces descriptions. A bool field is a
    ``--flag/--no-flag`` pair, any other is checked by its field's :class:`Option` (``check_field``). Flags
    default to None (= not given); the help shows the command's default."""
    for title, names in SECTIONS.items():
        section = [n for n in names if n not in exclude and (not only or n in only)]
        if not section:
            continue
        group = parser.add_argument_group(f"{title} options")
        for name in section:
            default = (defaults or {}).get(name, TrainConfig.__dataclass_fields__[name].default)
            flag = "--" + name.replace("_", "-")
            if OPTIONS[name].kind == "bool":
                group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                   help=_help(name, default, (helps or {}).get(name)))
            else:
                group.add_argument(flag, dest=name, type=_checker(name), default=None, metavar=_metavar(name),
                                   help=_help(name, default, (helps or {}).get(name)))


def load_yaml(path: str | None, *, exclude: dict[str, str] | None = None) -> dict:
    """TrainConfig values from a YAML file, each checked as the flags are; errors name the file and the key.

    Parsed with ``yaml.safe_load``: plain scalars, lists and mappings only, so a tag such as
    ``!!python/object/apply:os.system`` is refused instead of running code. ``exclude``: keys a command sets
    itself -> why (refused with that reason)."""
    if not path:
        return {}
    import yaml
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(f"{path}: refused: the config may hold only plain YAML values (strings, numbers, "
                          f"booleans, lists, mappings), it is parsed with yaml.safe_load and never builds Python "
                          f"objects; {exc.problem} {exc.problem_mark or ''}".strip()) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of training options (e.g. 'group_size: 8'), "
                          f"got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        if key not in TrainConfig.__dataclass_fields__:
            hint = suggest_field(str(key)) or " (see grao train --help; YAML keys are the option names with _)"
            raise ConfigError(f"{path}: unknown option {key!r}{hint}")
        if exclude and key in exclude:
            raise ConfigError(f"{path}: {key!r} cannot be set here: {exclude[key]}")
        try:
            out[key] = check_field(key, value)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return out


def build_config(args: argparse.Namespace, base: dict | None = None, *, exclude: dict[str, str] | None = None,
                 saved_run: bool = True) -> TrainConfig:
    """TrainConfig from: dataclass defaults < ``base`` < YAML ``--config`` < explicit flags; validated.

    With resume (and ``saved_run``): dataclass defaults < ``base`` < the saved run's settings (the config.json
    in output_dir) < YAML < flags, so that an option not given continues the run as it was; one given that
    differs from the saved value is then refused by the Trainer unless ``RESUME_SAFE`` (``--resume``'s help)."""
    values = dict(base or {})
    given = load_yaml(getattr(args, "config", None), exclude=exclude)  # the options the user gave
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            given[f.name] = v
    if saved_run and given.get("resume", values.get("resume", False)):
        output_dir = given.get("output_dir", values.get("output_dir", TrainConfig.output_dir))
        values.update(saved_run_values(output_dir, given))
    values.update(given)
    return TrainConfig(**values).validate()


def saved_run_values(output_dir: str, given: dict) -> dict:
    """The settings of the run saved in ``output_dir`` that ``given`` does not set, each checked as a YAML key
    (an error names the file), or {} when it holds no run. Never resume / overwrite / output_dir: the command
    line's own."""
    from grao.trainer.checkpoint import saved_run_config

    found = saved_run_config(output_dir)
    if found is None:
        return {}
    saved, where = found
    out = {}
    for key, value in saved.items():
        if key in given or key in ("resume", "overwrite", "output_dir") or key not in TrainConfig.__dataclass_fields__:
            continue  # given; the command line's own; or a field since removed
        try:
            out[key] = check_field(key, value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc} (the resumed run's setting; giving --{key.replace('_', '-')} "
                              f"overrides it where --resume allows that change)") from None
    return out


def comma_list(kind: str, choices: tuple = ()):
    """argparse type: a comma-separated list of ``choices`` (kind "choice") or of integers >= 0 ("int")."""
    what = f"a comma-separated list of {', '.join(choices)}" if kind == "choice" else \
        "comma-separated integers >= 0"

    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        for x in items:
            ok = x in choices if kind == "choice" else x.isdigit()
            if not ok:
                close = difflib.get_close_matches(x, choices, n=1) if kind == "choice" else []
                hint = (f" ({x!r}: did you mean {close[0]!r}?)" if close
                        else f" ({x!r} is not {'one of them' if kind == 'choice' else 'an integer >= 0'})")
                raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}{hint}")
        if len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(f"must not repeat an item, got {text!r}")
        return items if kind == "choice" else [int(x) for x in items]
    return parse


def model_source(text: str) -> str:
    """argparse type: 'demo', an existing directory, or a name shaped like a Hugging Face hub id."""
    try:
        check_model_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)
