"""Built-in plugins, one module per component; registered through the same hooks as third parties."""
