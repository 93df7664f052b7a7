"""Deployment modes: batch jobs, Kubernetes, edge artifacts."""
