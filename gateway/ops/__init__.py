"""Operations: serving (server, supervisor) and the operator commands; imports every layer
below."""
