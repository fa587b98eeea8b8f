"""miras-pretrain: pretraining Miras-family sequence models (Behrouz et al., 2025) at scale."""

__version__ = "0.1.0"
