"""Test set-up: eight fake CPU devices, so multi-device code runs on any machine."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
