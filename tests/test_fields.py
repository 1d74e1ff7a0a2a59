"""Feature fields in data: declaring, fitting and encoding fields, the Features tables,
MovieLens' fields and load_table's column mapping, with clear errors for bad values."""

import datetime
import zlib

import numpy as np
import pytest

from rankfast.data import Field, Interactions, Schema, build_features, load_table, random_split
from rankfast.data.fields import OOV, PAD


def test_field_declarations_are_checked():
    with pytest.raises(ValueError, match="side must be one of"):
        Field("genre", "movie")
    with pytest.raises(ValueError, match="kind must be one of"):
        Field("genre", "item", "bag")
    with pytest.raises(ValueError, match="identifier"):
        Field("two words", "item")
    with pytest.raises(ValueError, match="vocab entries must be distinct"):
        Field("genre", "item", vocab=("b", "a", "b"))
    with pytest.raises(ValueError, match="a vocab or buckets, not both"):
        Field("genre", "item", vocab=("a",), buckets=4)
    with pytest.raises(ValueError, match="dim is for dense fields"):
        Field("genre", "item", dim=3)
    with pytest.raises(ValueError, match="max_len is for multi-valued"):
        Field("genre", "item", max_len=3)
    with pytest.raises(ValueError, match="buckets must be a positive int"):
        Field("genre", "item", buckets=0)
    with pytest.raises(ValueError, match="names must be distinct"):
        Schema([Field("a", "item"), Field("a", "user")])
    assert Field.from_dict(Field("a", "item", vocab=["x", "y"]).to_dict()) == Field("a", "item", vocab=("x", "y"))


def test_categorical_vocabulary_unknown_and_missing_values_read_the_oov_row():
    field = Field("color", "item").fit(["red", "blue", None, "red", 3])
    assert field.vocab == ("3", "blue", "red") and field.rows == 4
    codes = field.encode(["red", "green", None, 3, "3", 3.0, "blue"])
    assert codes.tolist() == [3, OOV, OOV, 1, 1, 1, 2]  # values compare as strings; 3.0 is the category 3
    days = Field("day", "context", vocab=("Mon", "Tue", "Wed"))  # a given vocabulary keeps its order
    assert days.encode(["Wed", "Mon", "Sun"]).tolist() == [3, 1, OOV]


def test_hashed_buckets_are_crc32_and_need_no_fitting():
    field = Field("city", "user", buckets=7)
    assert field.fitted and field.rows == 8
    codes = field.encode(["paris", "oslo", None, "paris"])
    assert codes.tolist() == [
        1 + zlib.crc32(b"paris") % 7,
        1 + zlib.crc32(b"oslo") % 7,
        OOV,
        1 + zlib.crc32(b"paris") % 7,
    ]


def test_multi_valued_fields_pad_truncate_and_keep_the_first_values():
    field = Field("tags", "item", "multi").fit([["a", "b"], [], ["c", "a", "b"]])
    assert field.max_len == 3 and field.vocab == ("a", "b", "c")
    short = Field("tags", "item", "multi", vocab=("a", "b", "c"), max_len=2)
    got = short.encode([["a", "b"], [], ["c", "z", "b"], None])
    assert got.tolist() == [[1, 2], [PAD, PAD], [3, OOV], [PAD, PAD]]


def test_dense_fields_take_numbers_and_name_the_row_of_a_nan():
    field = Field("price", "item", "dense").fit([[1.0, 2.0], [3.0, 4.0]])
    assert field.dim == 2
    assert field.encode(np.ones((3, 2))).dtype == np.float32
    with pytest.raises(ValueError, match=r"field 'price': item 7: \[1.0, nan\] is not a finite number"):
        field.encode([[0, 0]] * 7 + [[1.0, float("nan")]], lambda j: f"item {j}")
    with pytest.raises(ValueError, match="expected 2 numbers a row"):
        field.encode([1.0, 2.0])
    with pytest.raises(ValueError, match="field 'color': row 1: nan is not a category"):
        Field("color", "item").fit(["red", float("nan")])


def test_build_features_fits_encodes_and_names_a_missing_field():
    features = build_features(
        [Field("age", "user"), Field("genres", "item", "multi"), Field("hour", "context")],
        num_users=2,
        num_items=3,
        num_rows=4,
        user={"age": [30, 40]},
        item={"genres": [["x"], ["x", "y"], []]},
        context={"hour": [1, 2, 1, 23]},
    )
    assert features.schema.names == ("age", "genres", "hour")
    assert features.user.values["age"].tolist() == [1, 2]
    assert features.item.values["genres"].tolist() == [[1, PAD], [1, 2], [PAD, PAD]]
    assert features.context.values["hour"].tolist() == [1, 2, 1, 3]  # vocab "1", "2", "23"
    assert features.subset([3, 0]).context.values["hour"].tolist() == [3, 1]
    with pytest.raises(ValueError, match=r"field 'year': not in the data .*'genres \(item\)'"):
        build_features([Field("year", "item")], num_users=2, num_items=3, num_rows=4, item={"genres": [[]] * 3})
    with pytest.raises(ValueError, match="field 'age': 3 values for 2 user rows"):
        build_features([Field("age", "user")], num_users=2, num_items=3, num_rows=4, user={"age": [1, 2, 3]})


def test_a_vocabulary_that_does_not_fit_is_an_error_naming_the_field():
    features = build_features(
        [Field("color", "item")], num_users=1, num_items=2, num_rows=0, item={"color": ["a", "b"]}
    )
    other = Field("color", "item", vocab=("a", "b", "c"))
    with pytest.raises(ValueError, match=r"field 'color': the data's vocabulary \(2 values\) does not fit the model's"):
        features.select([other])
    with pytest.raises(ValueError, match=r"field 'shape': not in the data"):
        features.select([Field("shape", "item", vocab=("x",))])


def test_interactions_carry_features_through_subsets_and_clicks():
    data = Interactions.from_raw([1, 1, 2, 3], [10, 11, 10, 12], [4.0, 2.5, 5.0, 3.5], [5, 6, 7, 8])
    features = build_features(
        [Field("hour", "context")], num_users=3, num_items=3, num_rows=4, context={"hour": [0, 1, 2, 3]}
    )
    data = Interactions(
        data.users, data.items, data.ratings, data.timestamps, data.user_ids, data.item_ids, None, features
    )
    part = data.subset(np.array([False, True, True, False]))
    assert part.features.context.values["hour"].tolist() == [2, 3]
    assert data.clicks(4.0).ratings.tolist() == [1.0, 0.0, 1.0, 0.0]
    train, test = random_split(data, 0.5, seed=0)
    assert len(train.features.context) == len(train) and len(test.features.context) == len(test)
    with pytest.raises(ValueError, match="the context table has 4 rows for 2"):
        Interactions(part.users, part.items, None, None, data.user_ids, data.item_ids, None, features)


def test_movielens_fields(ml_latest_small):
    data = ml_latest_small
    schema = data.features.schema
    assert schema.names == ("genres", "year", "tags", "hour", "weekday")
    assert [f.side for f in schema] == ["item", "item", "item", "context", "context"]
    toy_story = int(data.item_ids.index([1])[0])  # "Toy Story (1995)", Adventure|Animation|Children|Comedy|Fantasy
    genres = schema["genres"].vocab
    got = [genres[c - 1] for c in data.features.item.values["genres"][toy_story] if c != PAD]
    assert got == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert schema["year"].vocab[data.features.item.values["year"][toy_story] - 1] == "1995"
    tags = [schema["tags"].vocab[c - 1] for c in data.features.item.values["tags"][toy_story] if c != PAD]
    assert "pixar" in tags and len(tags) <= 10
    for row in (0, 12345, len(data) - 1):  # hour and weekday (Monday = 0) of the rating, in UTC
        when = datetime.datetime.fromtimestamp(int(data.timestamps[row]), tz=datetime.timezone.utc)
        hour = schema["hour"].vocab[data.features.context.values["hour"][row] - 1]
        weekday = schema["weekday"].vocab[data.features.context.values["weekday"][row] - 1]
        assert (int(hour), int(weekday)) == (when.hour, when.weekday())


def test_load_table_maps_columns_to_fields(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(
        "user,item,clicked,age_group,genre_list,price,hour\n"
        "u1,i1,1,young,a|b,1.5,3\n"
        "u2,i1,0,old,a|b,1.5,4\n"
        "u1,i2,0,young,,2.0,3\n"
    )
    data = load_table(
        path,
        user="user",
        item="item",
        rating="clicked",
        fields=[
            Field("age", "user"),
            Field("genres", "item", "multi"),
            Field("price", "item", "dense"),
            Field("hour", "context"),
        ],
        columns={"age": "age_group", "genres": "genre_list"},
    )
    f = data.features
    assert f.schema["age"].vocab == ("old", "young") and f.user.values["age"].tolist() == [2, 1]  # u1, u2
    assert f.item.values["genres"].tolist() == [[1, 2], [PAD, PAD]]
    assert f.item.values["price"].tolist() == [[1.5], [2.0]]
    assert f.context.values["hour"].tolist() == [1, 2, 1]


@pytest.mark.parametrize(
    "row, fields, match",
    [
        (
            "u1,i1,1,young,a,1.5,3\nu1,i2,0,old,a,1.5,3\n",
            [Field("age", "user")],
            r"user 'u1' has two values, 'young' .*:2\) and 'old' .*:3\)",
        ),
        (
            "u1,i1,1,young,a,cheap,3\n",
            [Field("price", "item", "dense")],
            r"log.csv:2: field 'price': 'cheap' is not a number",
        ),
        (
            "u1,i1,1,young,a,nan,3\n",
            [Field("price", "item", "dense")],
            r"field 'price': .*item 'i1': \[nan\] is not a finite",
        ),
        ("u1,i1,1,young,a,1.5,3\n", [Field("colour", "item")], r"field 'colour': column 'colour' not in the header"),
    ],
)
def test_load_table_field_errors_name_the_field_and_row(tmp_path, row, fields, match):
    path = tmp_path / "log.csv"
    path.write_text("user,item,clicked,age,genres,price,hour\n" + row)
    with pytest.raises((ValueError, KeyError), match=match):
        load_table(path, user="user", item="item", rating="clicked", fields=fields)
