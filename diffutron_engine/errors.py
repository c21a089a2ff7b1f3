"""The one exception type for bad input that a user can fix, the check of text that must be UTF-8, and
the warning category the CLI prints as one line."""


class DiffutronError(ValueError):
    """Bad input: the message names the problem and what to do about it.

    The CLI prints it as a single line on stderr and exits with code 2.
    """


def check_utf8(text: str, what: str, from_os: bool = False) -> str:
    """`text` if it can be encoded as UTF-8, else a DiffutronError naming `what` and the offending
    character. Python keeps bytes that are not UTF-8 (in arguments, and on stdin under a C locale) as
    surrogates \\udc80-\\udcff (`from_os`: the text came from there, so name the byte), and JSON may
    spell a lone surrogate ("\\ud800"); no tokenizer takes either."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if from_os and 0xDC80 <= code <= 0xDCFF:
            bad = f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8"
        else:
            bad = f"a lone surrogate \\u{code:04x}, which is not a character"
        raise DiffutronError(f"{what} holds {bad} (at character {exc.start}); give UTF-8 text") from None
    return text


class ContextTooLong(DiffutronError):
    """A prompt plus its new tokens beyond the model's context (max_position_embeddings)."""


class PromptError(DiffutronError):
    """A bad prompt in a call of several: `index` is its position and `reason` the problem, so that a
    caller can name the prompt its own way (a file's line, a request's choice); `too_long` when the
    problem is the model's context (the caller may name its own flag for the new tokens)."""

    def __init__(self, index: int, reason: str, too_long: bool = False):
        super().__init__(f"prompt {index + 1}: {reason}")
        self.index, self.reason, self.too_long = index, reason, too_long


class DiffutronWarning(UserWarning):
    """Something the user should know that is not an error (e.g. a checkpoint whose weights are all
    zero). The CLI prints it as one line on stderr."""


class RunFailed(RuntimeError):
    """A run that failed for a reason other than its input (a training run that diverged): the command
    line prints its message as one line and exits 1, where bad input (DiffutronError) exits 2."""


class StepFailed(RuntimeError):
    """Raised by Engine.step() (and so by generate(), infill() and stream()) when the step raised: its
    requests are already finished with finish_reason "error" and removed, slots freed, and the engine
    is usable. `outputs` is what the step reports (the failed requests' final outputs among them, with
    `error` set; aborts carried out before the failure); `__cause__` is the original exception."""

    def __init__(self, outputs: list, exc: BaseException):
        self.outputs = outputs
        failed = [o.request_id for o in outputs if o.finish_reason == "error"]
        super().__init__(f"an engine step failed with {type(exc).__name__}: {exc} "
                         f"({len(failed)} request(s) ended with an error: {', '.join(failed[:4])}"
                         f"{', ...' if len(failed) > 4 else ''})")
