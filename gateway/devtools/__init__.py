"""Dev tools: simulator, demo, sample images; may import any layer, none imports them."""
