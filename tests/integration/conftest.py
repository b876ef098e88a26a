import pytest

from .comfy_server import ComfyServer, comfyui_path

CKPT = "sd15-random.safetensors"


@pytest.fixture(scope="session")
def server(tmp_path_factory, sd15_checkpoint):
    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout")
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / CKPT).symlink_to(sd15_checkpoint)
    srv = ComfyServer(base).start()
    yield srv
    srv.stop()
