"""Training and compression recipes: the nano teacher, and Neodragon's four compression recipes."""
