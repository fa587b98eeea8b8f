"""Study files for `miras-pretrain study` (docs/study.md), shipped as package data."""
