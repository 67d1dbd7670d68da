

def test_interpolate_temperature():
    search = [dict(temperature=0.9, mean_surprisal=3.0), dict(temperature=1.1, mean_surprisal=4.0),
              dict(temperature=1.3, mean_surprisal=6.0)]
    assert T.interpolate_temperature(search, 3.5) == 1.0
    assert T.interpolate_temperature(search, 5.0) == 1.2
    assert T.interpolate_temperature(search, 9.0) == 1.3  # outside the grid: the nearest end
    assert T.interpolate_temperature(search, 1.0) == 0.9
