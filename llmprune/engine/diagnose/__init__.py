"""`doctor` and the health check: tensor scan, structure check, forward probe,
findings, verdicts and advice."""
