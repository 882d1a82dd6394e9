"""The one user-error type of the package, in a module that imports nothing heavy (``fetch`` runs without torch)."""
from megatron_meml.errors import UserError


class ConvertError(UserError):
    """A problem with the user's input (checkpoint, config, layout) that names what is wrong."""
