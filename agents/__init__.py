"""Reference agents: each one focused job, each using only the public ``supervisor`` contract."""
