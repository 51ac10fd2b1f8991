"""Example applications that run on Tierline (``make up`` runs ``reports``)."""
