"""Inputs: fetching user URLs behind the URL guard, data URIs and image sizes."""
