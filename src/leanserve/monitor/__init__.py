"""Monitoring: the prediction log, reference profiles, drift detectors, feedback and alerts."""
