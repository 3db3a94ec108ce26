"""Operations: serving (server, supervisor), operator commands, notifications; imports every
layer below."""
