"""HTTP: fal's routes, the upload routes, limits, slow connections, auth and the errors they answer."""
