"""Stress tests and guardrails: corruptions, adversarial attacks, calibration, OOD, adaptation."""
