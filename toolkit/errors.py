class UserError(Exception):
    """A problem the user can fix (bad path, bad recipe, offline download...).

    The CLI prints it as one line and exits non-zero; `--debug` shows the traceback.
    """
