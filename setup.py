"Packaging for fuselab: everything is read from settings.ini (nbdev 2); `*_requirements` keys become extras."
import shlex
from configparser import ConfigParser
from pathlib import Path
import setuptools

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']
readme = Path('README.md')
statuses = ['0 - Pre-Planning', '1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable']
extras = {k[:-len('_requirements')].replace('_', '-'): shlex.split(v) for k, v in cfg.items()
          if k.endswith('_requirements') and k != 'requirements'}
setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'], keywords=cfg['keywords'],
    author=cfg['author'], author_email=cfg['author_email'], url=cfg['git_url'], license=cfg['license'],
    classifiers=['Development Status :: ' + statuses[int(cfg['status'])], 'Intended Audience :: Developers',
                 'Natural Language :: English', 'Programming Language :: Python :: 3'],
    project_urls={'Documentation': cfg['doc_host'] + cfg['doc_baseurl']},
    packages=setuptools.find_packages(include=[cfg['lib_path'], cfg['lib_path'] + '.*']),
    include_package_data=True,
    install_requires=shlex.split(cfg['requirements']),
    extras_require=extras,
    python_requires='>=' + cfg['min_python'],
    long_description=readme.read_text(encoding='utf8') if readme.exists() else cfg['description'],
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(),
                  'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
)
