"""The servers a user would pick instead of imgcls serve, set up as their docs recommend
for dynamic batching, doing the service's work on the same `.keras` file (bench.serve_bench).

    python -m bench.peers.litserve_app --model M.keras --size 224 --classes a,b,c --port P
    python -m bench.peers.ray_app      --model M.keras --size 224 --classes a,b,c --port P

Each accepts the upload the service takes (POST /predict, multipart field `image`), decodes
it with imgcls.images.decode_image + prepare_image, batches, calls `predict_on_batch` (or,
with `--runtime openvino`, the file's OpenVINO build compiled as the service compiles it) and
answers `{"predictions": [{"label", "probability"}, ...]}` (the top 3), so the load
generator's `predict_load` drives them unchanged. Pinned in bench/peers/requirements.txt
(`make bench-serve` installs it).
"""

# The model process's name (/proc/PID/comm, 15 bytes at most), set by work.name_this_process,
# so bench.sampling.peer_role splits CPU per image into front and model as for the service.
MODEL_PROCESS_NAME = "imgcls-peer-mdl"
