"""attnopt's error types. Every error a user can cause is one of these, with a message that
names the problem and what to try next.

Entry points: :class:`AttnoptError` and its subclasses.
"""


class AttnoptError(Exception):
    """Base class of attnopt's errors."""


class CaptureError(AttnoptError):
    """A model could not be captured into the IR; names the module/op and the methods tried."""


class SignatureError(AttnoptError, TypeError):
    """Inputs that do not fit the compiled model's call signature."""


class PassError(AttnoptError):
    """A pass failed or left the graph invalid; names the pass and the pipeline before it."""


class PipelineError(AttnoptError, ValueError):
    """A pipeline text or pass option that does not parse or type-check; names the option."""


class BackendError(AttnoptError, ValueError):
    """An unknown or unavailable backend."""


class PlanError(AttnoptError, ValueError):
    """A saved plan that cannot be applied: corrupt or truncated, a newer format version, or made
    for another model, layer count, site or pipeline; names the mismatch."""


class CalibrationError(AttnoptError, ValueError):
    """Calibration or validation data is missing, empty, ill-shaped, or does not run the model."""


class GenerationError(AttnoptError, ValueError):
    """``generate`` cannot serve this model or request: no causal LM head, an option it does not
    implement, a prompt or token count past the cache or the model's positions; names the limit
    and the option to change."""
