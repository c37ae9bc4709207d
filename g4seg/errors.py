"""One exception type for every user-facing failure, so the CLI can print one line and exit non-zero."""


class G4SegError(Exception):
    """A problem the user can fix (bad input, missing model, unknown name); printed as one line."""


class PluginError(G4SegError):
    """A plugin could not be loaded or registered a conflicting name."""
