"""Subcommands of the `rlpost` console command (see `rlpost.cli`)."""
