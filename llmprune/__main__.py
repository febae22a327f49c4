"""`python -m llmprune` is the same command as `llmprune`."""

from llmprune.cli.app import main

if __name__ == "__main__":
    main()
