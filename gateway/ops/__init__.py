"""Operations: CLI, server, supervisor, logs, metrics, usage; imports every layer below."""
