"""dnc: a reference pipeline for deep neural collapse (DUFM theory, collapse metrics, Deep RFM)."""

__version__ = "0.1.0"
