"""windowpipe core: pure window logic, config, durable state and locks."""
