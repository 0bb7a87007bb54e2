"""Pieces every service shares: settings, logs, the gRPC server shell, errors, money."""
