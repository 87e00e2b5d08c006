"""The synthetic_details generator: procedural pedestrians in families."""
