import click
@click.group()
def main():
    """x"""
@main.command()
def hello():
    from trajinv.kernels import __doc__ as d
    print("hi", d)
