"""Exceptions whose message is shown to the user as a one-line error."""


class EnformerVepError(Exception):
    """An error the user can act on; the CLI prints its message and exits non-zero."""


class WeightsError(EnformerVepError):
    """Model weights are missing, corrupt, unsafe or do not fit the architecture."""


class DownloadError(EnformerVepError):
    """A model file could not be downloaded or failed verification."""


class InputError(EnformerVepError):
    """A VCF, FASTA, region or option the run cannot use as given."""
