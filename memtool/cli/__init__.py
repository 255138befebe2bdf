"""The command-line layer: parses, validates, calls one library function, renders."""
