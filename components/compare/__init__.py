"""The compare step: several fine-tuning recipes as branches, and the pick of a winner."""
