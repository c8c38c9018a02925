from mmscope.world import Scene, WorldObject, caption
from mmscope.world.captions import caption_objects, hallucinated


def test_mentions_are_read_back_in_order():
    text = "a red circle , a blue square and a green cross"
    assert caption_objects(text) == ["red circle", "blue square", "green cross"]
    assert caption_objects("a red circle,a blue square") == ["red circle", "blue square"]
    assert caption_objects("red and circle") == []


def test_hallucinated_mentions_against_the_scene():
    scene = Scene(
        (
            WorldObject("circle", "red", "large", "top left"),
            WorldObject("cross", "green", "small", "bottom right"),
        )
    )
    assert caption_objects(caption(scene)) == ["red circle", "green cross"]
    assert hallucinated(caption(scene), scene) == []
    assert hallucinated("a red circle and a blue square", scene) == ["blue square"]
