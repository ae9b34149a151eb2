"""The project's own error types. `tinyllm` prints these as one line (`tinyllm: error: ...`, exit 2) because they
describe the user's input or run, not a bug; anything else keeps its traceback (and `--debug` or TINYLLM_DEBUG=1
shows the traceback of these too)."""


class UsageError(ValueError):
    """Input that cannot be used as given: a missing or malformed file, an impossible option, a folder of the wrong
    kind. The message says what and where (file, line, key)."""


class TrainingDivergedError(RuntimeError):
    """The loss, a gradient or a reward stopped being a finite number: the run stops at that step, naming it."""
