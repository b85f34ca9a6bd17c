"""`imagegen funnel`: progressive refinement from many drafts to one final image."""
