"""Tests import the megatron-core CPU runtime as ``mcore_harness``; it lives in ``streamconv.reference.mcore`` so that
``streamconv demo`` uses the very same code."""

import sys

import streamconv.reference.mcore as _mcore

sys.modules[__name__] = _mcore
