"""The one error class of the conversion: a problem the user can fix (recipe, source files, output folder)."""


class ConversionError(ValueError):
    """A bad recipe, source or output folder. The message names the thing and the fix; the command line prints it on
    one line and exits with status 2, without a traceback."""
