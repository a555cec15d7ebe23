"""Error types with the exit codes the CLI promises (documented in the README)."""

from __future__ import annotations


class BridgeError(Exception):
    """A problem the user can fix; the message is one line naming the file/key and the expectation."""

    exit_code = 3


class InputError(BridgeError):
    """The input checkpoint is missing, malformed or inconsistent."""

    exit_code = 3


class OutputError(BridgeError):
    """The output location is unusable: exists without --force, inside the input, not writable."""

    exit_code = 4


class UnsupportedError(BridgeError):
    """The request is well-formed but Megatron (or this tool) cannot do it, e.g. a TP that does not divide."""

    exit_code = 5


class VerificationFailed(BridgeError):
    """Two checkpoints differ beyond tolerance."""

    exit_code = 1
