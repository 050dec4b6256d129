"""Command-line tools of siglip2-navit: encode, convert, push, benchmark, visualize.

Installed with the package (`pip install siglip2-navit`) as console commands:

    navit-encode      encode images, folders, globs or a dataset into shards (resumable; `[encode]` for parquet/datasets)
    navit-convert     convert a transformers / Ovis2.5 checkpoint into a packed model folder
    navit-push        validate a converted folder and upload it to the Hub (`[hub]`)
    navit-benchmark   measure the packed encoder against transformers' padded naflex model (`[bench]` for plots)
    navit-visualize   pictures of a model's patch features (and CLS / pooling attention) for images or video frames

These modules are never copied into a converted model folder: a folder ships only the remote-code modules at the
package root.
"""
