"""Files copied next to saved non-uniform models so that transformers can load them."""
