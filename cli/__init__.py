"""What the entry points (train.py, evaluate.py, analyze.py) share: config resolvers, clear
errors for missing choices, and building the editor a config describes (cli/config.py)."""
