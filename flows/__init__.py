"""Prefect flows of the ubo pipeline: thin orchestration over `ubo_core`, no science here."""
