"""MPC protocols as plain functions of ``(session, shares, material)``."""
