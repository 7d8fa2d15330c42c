"""lite-sft's one error tree: every mistake a user can fix is a LiteSftError whose message is one line naming
the file, line, field or path and what to do. The CLI prints it and exits 2; anything else is a bug.

    try:
        train(cfg)
    except LiteSftError as err:      # ConfigError, DataError, ModelError, ... one `except` for all of them
        print(f"error: {err}")

Each class keeps the built-in base it had before the tree existed (ValueError for what was read, RuntimeError
for what was found while running), so an `except ValueError` written against an older lite-sft still works.
This module is the bottom of the import graph: it imports nothing.
"""


class LiteSftError(Exception):
    """Something the user can fix; the message says what and how, in one line."""


class ConfigError(LiteSftError, ValueError):
    """A config that cannot run; the message lists every problem found."""


class DataError(LiteSftError, ValueError):
    """Data that cannot be used; the message names the file, the record and what to do."""


class ModelError(LiteSftError, RuntimeError):
    """A base model, tokenizer or quantisation backend that cannot be used; the message says why."""


class CheckpointError(LiteSftError, RuntimeError):
    """A checkpoint or the best adapter could not be written (a full disk, a lost mount); the partial folder
    is removed and the message says which checkpoint is the last good one and how to resume from it."""


class RunDirError(LiteSftError, RuntimeError):
    """The output directory cannot be used as asked (exists, or has nothing to resume)."""


class ExportError(LiteSftError, RuntimeError):
    """A run directory, base model or output folder that cannot be exported as asked; the message says why."""


class ServeError(LiteSftError, RuntimeError):
    """A model folder, device or server setting that cannot be used as asked; the message says why."""


class UnknownAdapter(ServeError):
    """A request or an unload names an adapter the server does not serve (the server answers 404 with the list)."""


class AdapterConflict(ServeError):
    """Loading a name already served, or unloading one that requests still use (the server answers 409)."""
